"""Retriever, prompt, model and the LCEL chain."""

from settings import import_pymilvus_safely

import_pymilvus_safely()
