"""Qt widgets as PythonQt shows them to the module, for tests without Qt: properties are attributes,
``connect`` records slots, ``emit`` calls them, ``click`` emits ``clicked()``."""


class Widget:
    def __init__(self, **props):
        self.__dict__.update(props)
        self.slots = {}

    def connect(self, signal_name, slot):
        self.slots.setdefault(signal_name, []).append(slot)

    def emit(self, signal_name, *args):
        for slot in self.slots.get(signal_name, []):
            slot(*args)

    def click(self):
        self.emit("clicked()")
