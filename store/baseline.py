"""The tutorial's naive pipeline, kept as the evaluation baseline that this project improves on."""

from __future__ import annotations

from typing import Any

from langchain_core.documents import Document

from settings import import_pymilvus_safely
from store.milvus import GRPC_OPTIONS


class NaivePipeline:
    """The tutorial's pipeline: split each file on "# ", one dense vector per piece (no cap,
    the model truncates at 256 tokens), a Milvus Lite collection with IP metric, top-k.

    Kept only as a baseline: it is what this project improves on.
    """

    def __init__(self, embeddings: Any, uri: str, collection: str = "naive_baseline"):
        import_pymilvus_safely()
        from pymilvus import MilvusClient

        self.embeddings = embeddings
        self.client = MilvusClient(uri=uri, grpc_options=GRPC_OPTIONS)
        self.collection = collection
        self.chunks = 0

    def build(self, paths: list[str]) -> NaivePipeline:
        """Load and index the files under `paths` (dropping an earlier baseline)."""
        from loaders.markdown import naive_chunks
        from loaders.sources import DocumentSourceLoader

        documents = [
            chunk
            for doc in DocumentSourceLoader(paths).lazy_load()
            for chunk in naive_chunks(doc.metadata["source"], doc.page_content)
        ]
        if self.client.has_collection(self.collection):
            self.client.drop_collection(self.collection)
        self.client.create_collection(
            self.collection,
            dimension=self.embeddings.dimension,
            metric_type="IP",
            consistency_level="Strong",
        )
        texts = [d.page_content for d in documents]
        vectors = self.embeddings.embed_documents(texts)
        rows = [
            {"id": i, "vector": v, "text": t, "source": d.metadata["source"]}
            for i, (v, t, d) in enumerate(zip(vectors, texts, documents, strict=True))
        ]
        for start in range(0, len(rows), 1000):
            self.client.insert(self.collection, rows[start : start + 1000])
        self.client.flush(self.collection)
        self.chunks = len(rows)
        return self

    def retrieve(self, query: str, k: int) -> list[Document]:
        """Top-k pieces; each piece's first line is its heading (as the tutorial splits)."""
        vector = self.embeddings.embed_query(query)
        hits = self.client.search(self.collection, data=[vector], limit=k, output_fields=["text", "source"])[
            0
        ]
        documents = []
        for hit in hits:
            text = hit["entity"]["text"]
            heading = text.strip().splitlines()[0].lstrip("#").strip() if text.strip() else ""
            documents.append(
                Document(
                    page_content=text,
                    metadata={
                        "source": hit["entity"]["source"],
                        "headers": [heading],
                        "score": hit["distance"],
                    },
                )
            )
        return documents

    def close(self) -> None:
        """Drop the baseline collection and close the client."""
        if self.client.has_collection(self.collection):
            self.client.drop_collection(self.collection)
        self.client.close()
