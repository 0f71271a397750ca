"""convo: a stateful conversation manager over Anthropic's stateless Messages API."""
