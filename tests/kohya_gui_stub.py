"""Run pieces of the real kohya_ss GUI (bmaltais/kohya_ss) without gradio, in a child process.

``python tests/kohya_gui_stub.py KOHYA_SS_DIR ACTION [ARG]`` prints one JSON document:

- ``fields``: the LoRA tab's fields as ``lora_tab`` builds them (name -> component, value type,
  choices), from the GUI's own ``last_built_field_registry``; tests/data/kohya_gui_fields.json
  was made with it.
- ``command TEXT``: the words ``common_gui.run_cmd_advanced_training`` appends for Additional
  parameters TEXT.
- ``load FILE``: the values the GUI's ``open_configuration`` loads from a config or preset FILE,
  by field name.
- ``print FILE``: "Print training command" after loading FILE over the fields' defaults: the
  command ``train_model`` builds and the TOML it writes (``accelerate`` stands for its path).

gradio and easygui are replaced by recording stand-ins: building the tab and the command is plain
Python. A child process keeps the GUI's sys.path, logging and excepthook changes out of the tests;
run it in a scratch folder (the GUI's logging writes setup.log into the current one).
"""

from __future__ import annotations

import inspect
import json
import sys
import types


class _Stub:
    """Any gradio object: a component records its class name and keyword arguments."""

    def __init__(self, *args, **kwargs):
        self.kind, self.kwargs = type(self).__name__, kwargs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub()

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __iter__(self):
        return iter(())

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


_CLASSES: dict[str, type] = {}


def _component(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _CLASSES.setdefault(name, type(name, (_Stub,), {}))


def install_stubs() -> None:
    for name in ("gradio", "gradio.themes", "gradio.themes.utils", "gradio.themes.utils.fonts"):
        module = types.ModuleType(name)
        module.__getattr__ = _component
        sys.modules[name] = module
    easygui = types.ModuleType("easygui")
    easygui.msgbox = easygui.ynbox = easygui.boolbox = lambda *a, **k: None
    sys.modules["easygui"] = easygui


def _type(component: _Stub) -> str:
    kind, kw = component.kind, component.kwargs
    if kind in ("Checkbox",):
        return "bool"
    if kind == "Number":
        return "int" if kw.get("precision") == 0 else "number"
    if kind == "Slider":
        return "number"
    if kind == "Dropdown" and kw.get("multiselect"):
        return "list"
    return "str"


FIXED_CHOICES = ("LoRA_type", "optimizer", "mixed_precision", "lr_scheduler", "xformers")


def fields(lora_gui) -> dict:
    from kohya_gui.class_gui_config import KohyaSSGUIConfig

    lora_gui.lora_tab(headless=True, config=KohyaSSGUIConfig(config_file_path="/nonexistent/config.toml"))
    out = {}
    for name, comp in lora_gui.last_built_field_registry:
        entry = {"component": comp.kind, "type": _type(comp)}
        if name in FIXED_CHOICES:
            entry["choices"] = list(comp.kwargs.get("choices") or [])
        out[name] = entry
    loader = [p for p in inspect.signature(lora_gui.open_configuration).parameters
              if p not in ("ask_for_file", "apply_preset", "file_path")]
    for name in loader:  # training_preset: read by the loader, not a registry field
        out.setdefault(name, {"component": "Dropdown", "type": "str"})
    return out


def load(lora_gui, path: str) -> dict:
    names = [p for p in inspect.signature(lora_gui.open_configuration).parameters
             if p not in ("ask_for_file", "apply_preset", "file_path")]
    values = lora_gui.open_configuration(False, False, path, *([None] * len(names)))
    return dict(zip(names, values[1:]))


def _TEXTBOXES(lora_gui) -> set:
    return {name for name, comp in lora_gui.last_built_field_registry if comp.kind == "Textbox"}


def print_command(lora_gui, path: str) -> dict:
    from kohya_gui.class_gui_config import KohyaSSGUIConfig

    lora_gui.lora_tab(headless=True, config=KohyaSSGUIConfig(config_file_path="/nonexistent/config.toml"))
    defaults = {name: comp.kwargs.get("value", "" if comp.kind == "Textbox" else None)  # gradio: a Textbox holds ""
                for name, comp in lora_gui.last_built_field_registry}
    defaults = {name: "" if value is None and name in _TEXTBOXES(lora_gui) else value for name, value in defaults.items()}
    names = [p for p in inspect.signature(lora_gui.open_configuration).parameters
             if p not in ("ask_for_file", "apply_preset", "file_path")]
    values = lora_gui.open_configuration(False, False, path, *(defaults.get(n, "none") for n in names))
    loaded = dict(zip(names, values[1:]))
    loaded.pop("training_preset", None)
    captured: dict = {}

    def capture(run_cmd, tmpfilename):
        with open(tmpfilename, encoding="utf-8") as f:
            captured.update(command=list(run_cmd), toml=f.read())

    lora_gui.print_command_and_toml = capture
    lora_gui.executor = types.SimpleNamespace(is_running=lambda: False)
    lora_gui.get_executable_path = lambda name=None: "accelerate"
    lora_gui.train_model(headless=True, print_only=True, **loaded)
    return captured


def main(argv: list[str]) -> None:
    gui_dir, action = argv[1], argv[2]
    install_stubs()
    sys.path.insert(0, gui_dir)
    if action == "command":
        from kohya_gui.common_gui import run_cmd_advanced_training

        result = run_cmd_advanced_training(run_cmd=[], additional_parameters=argv[3])
    else:
        from kohya_gui import lora_gui

        actions = {"fields": lambda: fields(lora_gui), "load": lambda: load(lora_gui, argv[3]),
                   "print": lambda: print_command(lora_gui, argv[3])}
        result = actions[action]()
    sys.stdout.write("\n" + json.dumps(result, default=str) + "\n")


if __name__ == "__main__":
    main(sys.argv)
