"""The embedded OpenAI-compatible server: engine, adapters, wire protocol, service, routes."""
