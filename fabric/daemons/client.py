"""The client daemon: the host whose data is backed up (bpbkar) and restored (bpcd).

Its data is generated from the scenario seed into its own folder, or is a real folder.
"""

from __future__ import annotations

from pathlib import Path

from fabric.channel import Leg
from fabric.daemons.base import Daemon
from fabric.dataset import Dataset
from fabric.datastream import FileEntry, receive_to_folder, send_files
from fabric.dte import ClientMode, DteMode, Role, Version


class Client(Daemon):
    role = Role.CLIENT

    async def on_start(self) -> None:
        if self.config.data_path:
            self.dataset = Dataset.scan(Path(self.config.data_path))
        elif getattr(self, "dataset", None) is None:
            self.dataset = Dataset.generate(self.config.state_dir / "data", self.name, self.config.seed,
                                            self.config.data_files, self.config.data_size)
        self.generation = getattr(self, "generation", 0)

    async def cmd_send_backup(self, body: dict) -> dict:
        """bpbkar: send every file (full) or those changed since the base image (incremental)."""
        if self.config.data_path:
            self.dataset = Dataset.scan(Path(self.config.data_path))  # a real folder may have changed
        base: dict[str, str] | None = body.get("base_files")
        entries = [FileEntry(f.path, f.size, f.sha256) for f in self.dataset.files.values()
                   if base is None or base.get(f.path) != f.sha256]
        result = await self.send_leg(body["job_id"], "backup", DteMode(body["dte"]), body["receiver"], body["port"],
                                     lambda leg: send_files(leg, self.dataset.root, entries))
        result["files"] = [e.__dict__ for e in entries]
        return result

    async def cmd_expect_restore(self, body: dict) -> dict:
        folder = self.config.state_dir / "restore" / f"job{body['job_id']}"

        async def restore(leg: Leg) -> dict:
            entries, total = await receive_to_folder(leg, folder)
            return {"folder": str(folder), "bytes": total, "files": [e.__dict__ for e in entries]}

        self.expect(body["job_id"], body["leg"], DteMode(body["dte"]), body["sender"], restore)
        return {"port": self.legs.port}

    async def cmd_mutate(self, body: dict) -> dict:
        """Change some files so the next incremental has something to send."""
        self.generation += 1
        changed = self.dataset.mutate(self.name, self.config.seed, int(body["files"]), self.generation)
        return {"changed": changed}

    async def cmd_configure(self, body: dict) -> dict:
        """bpsetconfig -h <client> DTE_CLIENT_MODE = ..., or an upgrade."""
        if body.get("version"):
            self.config.version = Version.parse(body["version"])
        if body.get("dte_mode"):
            self.config.dte_mode = ClientMode(body["dte_mode"])
        return self.describe()
