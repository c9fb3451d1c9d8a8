"""nanollm's data tools: corpus.py (the shared reader), prepare.py (tokenized shards), curate.py (curation)."""
