"""`estafeta demo`: the whole pipeline against real local sinks, for a first look."""
