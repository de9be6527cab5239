"""Sample images from a trained prior and decode them with its tokenizer. The command lives in provq.commands.sample; installed, it is ``provq-sample``."""

from provq.commands.sample import entry

if __name__ == "__main__":
    entry()
