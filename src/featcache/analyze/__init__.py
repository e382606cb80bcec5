"""FAISS for every neighbour question: the index layer and the analyses built on it."""
