"""From a corpus to memory-mapped token windows: the config's data section (config), the
tokenizer, the source kinds (corpus), Project Gutenberg's books cut from their licence text
(gutenberg),
safe cut points in UTF-8 (textcut), the corpus cut into parts, the token-stream layout
(streams), the shard format and manifest (shards), the machines of one prepare (team),
and the loader that numbers windows and orders samples over processes (loader).

Must not know: models or training. Imports only core/ and the config.
A new source kind is a change here only: its keys in config.py, its reader in corpus.py.
"""
