"""The stage commands, each a ``main(argv)`` and an ``entry()`` (the console command ``provq-<name>``;
the repository's root scripts call the same entry): train_tokenizer, extract_codes, train_prior, sample,
demo."""
