"""Push providers (see :mod:`channels.push`): ``fcm`` and ``webhook``."""
