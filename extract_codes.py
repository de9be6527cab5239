"""Encode dataset splits once with a trained tokenizer into code shards bound to its fingerprint. The command lives in provq.commands.extract_codes; installed, it is ``provq-extract-codes``."""

from provq.commands.extract_codes import entry

if __name__ == "__main__":
    entry()
