"""Everything that can serve a model is a provider; local engines are one kind."""
