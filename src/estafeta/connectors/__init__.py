"""How a delivery reaches a destination: the `Connector` protocol, the HTTP connector with
Standard Webhooks signing, and the WhatsApp send clients; every failure of a destination is
an `Outcome`, never an exception."""
