"""The main job: both ProVQ stages on the built-in emoji dataset, evaluated, with a report. The command lives in provq.commands.demo; installed, it is ``provq-demo``."""

from provq.commands.demo import entry

if __name__ == "__main__":
    entry()
