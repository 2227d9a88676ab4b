"""The media server daemon: stores copies on its disk storage unit and moves them.

It receives backups from clients, sends copies to clients (restore), to other media
servers (duplication, replication), and reads them back for verify and import.
"""

from __future__ import annotations

import asyncio

from fabric.channel import Leg
from fabric.daemons.base import Daemon
from fabric.datastream import image_checksums, merge_images, receive_image, send_image, send_metadata
from fabric.dte import DteMode, MediaMode, Role, Version
from fabric.storage import DiskStorage


class MediaServer(Daemon):
    role = Role.MEDIA

    async def on_start(self) -> None:
        self.storage = DiskStorage(self.config.state_dir / "storage")
        swept = self.storage.recover()
        if swept:
            self.log.warning("swept half-written copies after a crash", copies=swept)

    # -- receiving ---------------------------------------------------------------------

    async def cmd_expect_store(self, body: dict) -> dict:
        """Get ready to store a copy arriving on a leg (backup, duplication, replication)."""
        pending = self.storage.new_copy(body["name"])  # fails now if the disk is full or down
        meta = body.get("meta")

        async def store(leg: Leg) -> dict:
            try:
                with pending.open_image() as out:
                    entries, total = await receive_image(leg, out, hash_files=body.get("hash_files", False))
                if meta is not None:
                    pending.write_meta({**meta, "files": [e.__dict__ for e in entries]})
                path = pending.commit()
            except BaseException:
                pending.discard()
                raise
            return {"path": str(path), "name": body["name"], "bytes": total,
                    "files": [e.__dict__ for e in entries]}

        expectation = self.expect(body["job_id"], body["leg"], DteMode(body["dte"]), body["sender"], store)
        expectation.done.add_done_callback(lambda f: pending.discard() if f.cancelled() or f.exception() else None)
        return {"port": self.legs.port}

    async def cmd_synthesize(self, body: dict) -> dict:
        """Merge component copies already received here into one synthetic full."""
        try:
            sources = [self.storage.image_file(name) for name in body["components"]]
            pending = self.storage.new_copy(body["name"])
            try:
                with pending.open_image() as out:
                    entries = await asyncio.to_thread(merge_images, sources, out)
                path = pending.commit()
            except BaseException:
                pending.discard()
                raise
        finally:
            for name in body["components"]:
                self.storage.delete(name)
        return {"path": str(path), "name": body["name"], "bytes": sum(e.size for e in entries),
                "files": [e.__dict__ for e in entries]}

    # -- sending -----------------------------------------------------------------------

    async def cmd_send_copy(self, body: dict) -> dict:
        """Send a stored copy to a client (restore) or a media server (duplication, replication)."""
        image = self.storage.image_file(body["copy"])
        return await self.send_leg(body["job_id"], body["leg"], DteMode(body["dte"]), body["receiver"], body["port"],
                                   lambda leg: send_image(leg, image), receiver_is_client=body.get("receiver_is_client", False))

    async def cmd_send_catalog_info(self, body: dict) -> dict:
        """Verify and import: read the copy back, hash it, send what was found to the primary."""
        image = self.storage.image_file(body["copy"])
        files = [e.__dict__ for e in await asyncio.to_thread(image_checksums, image)]
        meta = self.storage.read_meta(body["copy"]) if body.get("with_meta") else None
        payload = {"files": files, "meta": meta}
        return await self.send_leg(body["job_id"], body["leg"], DteMode(body["dte"]), body["receiver"], body["port"],
                                   lambda leg: _send_metadata_counted(leg, payload))

    async def cmd_read_meta(self, body: dict) -> dict:
        """The header of a replica that arrived from another domain (AIR import event)."""
        return {"meta": self.storage.read_meta(body["copy"]), "path": str(self.storage.root / body["copy"])}

    async def cmd_delete_copy(self, body: dict) -> dict:
        self.storage.delete(body["copy"])
        return {}

    async def cmd_configure(self, body: dict) -> dict:
        """`nbseccmd -setsecurityconfig -dtemediamode on|off`, or an upgrade."""
        if body.get("version"):
            self.config.version = Version.parse(body["version"])
        if body.get("dte_mode"):
            self.config.dte_mode = MediaMode(body["dte_mode"])
        return self.describe()

    async def cmd_inject_fault(self, body: dict) -> dict:
        """Failure injection for a media server in its own process (disk full, volume down)."""
        self.storage.full = bool(body.get("disk_full", self.storage.full))
        self.storage.down = bool(body.get("volume_down", self.storage.down))
        return {"disk_full": self.storage.full, "volume_down": self.storage.down}

    async def cmd_describe(self, body: dict) -> dict:
        return self.describe()


async def _send_metadata_counted(leg: Leg, payload: dict) -> int:
    await send_metadata(leg, payload)
    return leg.bytes_sent

