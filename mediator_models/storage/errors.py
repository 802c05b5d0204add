"""The errors of the storage layer, and the setting error every layer raises: each message is one line that names
the file, folder or setting and what is wrong.

They live apart from the modules that raise them so that checkpoints, diffusers weights and run folders can
share them without importing one another.
"""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message is one line naming the file and what is wrong."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not match the model; the message lists both and a likely cause."""


class FolderBusyError(RuntimeError):
    """Another live process is writing into the same run folder."""


class ConfigurationMismatchError(ValueError):
    """A folder holds work of another configuration; the message names every setting that differs."""


class SettingError(ValueError):
    """One setting has a value that cannot work. `setting` names it as the library does (a parameter or field
    name), so that a front end can name its own flag for it instead; `reason` says what is wrong and how to fix it.
    """

    def __init__(self, setting: str, reason: str):
        super().__init__(f"{setting}: {reason}")
        self.setting = setting
        self.reason = reason
