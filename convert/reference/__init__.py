"""The torch reference engine (backend "torch"), loaded by name from the formats
registry; the runtime never imports it."""
