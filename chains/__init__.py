"""Retrieval, prompts, the DeepSeek model and the LCEL chain that answers with citations."""
