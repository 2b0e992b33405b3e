"""The HTTP side: OpenAI protocol models, routes, auth, errors, and the gateway deployment."""
