"""Real local servers for tests of estafeta and of a configuration: `Sink`, a webhook
receiver whose answers a test can switch, and fake WhatsApp providers (`fakes/`)."""
