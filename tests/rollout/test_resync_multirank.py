"""Re-sync of a restarted server when the trainer has several ranks (rollout/router.py): from the
disk transport's newest export (no collective), or a clear error for the collective transports."""

from pathlib import Path

import pytest

from drpo_megatron.weights.sync import collective_only_resync, export_dir_resync
from drpo_megatron.rollout.server import ServerError


class RecordingServer:
    """Records the calls a resync makes (the SGLangServer methods it may use)."""

    name = "sglang-1"

    def __init__(self):
        self.calls = []

    def update_weights_from_disk(self, path, weight_version):
        self.calls.append(("disk", Path(path), weight_version))

    def set_weight_version(self, version):
        self.calls.append(("version", version))


def test_export_dir_resync_loads_newest_export(tmp_path):
    latest = {"dir": None}
    resync = export_dir_resync(lambda: latest["dir"])
    s = RecordingServer()
    resync(s, 0)  # before the first push: the server started from the initial checkpoint
    assert s.calls == [("version", "0")]
    with pytest.raises(ServerError, match="no weight export to re-sync version 3"):
        resync(s, 3)
    latest["dir"] = tmp_path / "v000003"
    resync(s, 3)
    assert s.calls[-1] == ("disk", tmp_path / "v000003", "3")


def test_collective_transport_resync_fails_with_the_fix():
    with pytest.raises(ServerError, match="rollout.weight_transport: disk") as e:
        collective_only_resync("distributed", 4)(RecordingServer(), 5)
    assert "sglang-1" in str(e.value) and "4 training ranks" in str(e.value)
