"""Every job status code fabric reports, in one table, with NetBackup's meanings.

Documented NetBackup codes where they exist (reference §11.6); the DTE family 83xx is
from unverified sources (reference §8.3), one code per cause, so it can be corrected here.
"""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    SUCCESS = 0
    PARTIAL = 1
    FILE_READ_FAILED = 13
    FILE_WRITE_FAILED = 14
    SOCKET_WRITE_FAILED = 24
    CANNOT_CONNECT = 25
    CONNECTION_BROKEN = 40
    CONNECTION_TIMED_OUT = 41
    CANT_CONNECT_TO_CLIENT = 58
    MEDIA_WRITE_ERROR = 84
    MEDIA_READ_ERROR = 85
    TERMINATED_BY_ADMIN = 150
    NO_IMAGES_PROCESSED = 191
    STORAGE_UNIT_UNAVAILABLE = 219
    NO_ENTITY_FOUND = 227
    DISK_VOLUME_DOWN = 2074
    DISK_STORAGE_SERVER_DOWN = 2106

    # DTE family, reference §8.3. 8301, 8308, 8310, 8311, 8314 are the candidates the
    # reference lists; the others fill the gaps so that each cause has its own code. [I]
    ENFORCED_MEDIA_UNSUPPORTED = 8301
    ENFORCED_CLIENT_UNSUPPORTED = 8302  # [I]
    ENFORCED_CLIENT_OFF = 8303  # [I]
    IMAGE_ON_CLIENT_UNSUPPORTED = 8308
    IMAGE_ON_MEDIA_UNSUPPORTED = 8309  # [I]
    CLIENT_ON_MEDIA_OFF = 8310
    ENFORCED_MEDIA_OFF = 8311
    IMAGE_ON_MEDIA_OFF = 8312  # [I]
    DTE_NEGOTIATION_REFUSED = 8313  # [I] a peer's data-channel header disagreed with the job
    RESTORE_CLIENT_ON_MEDIA_OFF = 8314
    TLS_HANDSHAKE_FAILED = 8316  # [I] the data channel's TLS handshake failed (certificate, version)

    @property
    def message(self) -> str:
        return MESSAGES.get(self, self.name.replace("_", " ").lower())


MESSAGES: dict[Status, str] = {
    Status.SUCCESS: "the requested operation was successful",
    Status.PARTIAL: "the requested operation was partially successful",
    Status.FILE_READ_FAILED: "file read failed",
    Status.FILE_WRITE_FAILED: "file write failed",
    Status.SOCKET_WRITE_FAILED: "socket write failed",
    Status.CANNOT_CONNECT: "cannot connect on socket",
    Status.CONNECTION_BROKEN: "network connection broken",
    Status.CONNECTION_TIMED_OUT: "network connection timed out",
    Status.CANT_CONNECT_TO_CLIENT: "can't connect to client",
    Status.MEDIA_WRITE_ERROR: "media write error",
    Status.MEDIA_READ_ERROR: "media read error",
    Status.TERMINATED_BY_ADMIN: "termination requested by administrator",
    Status.NO_IMAGES_PROCESSED: "no images were successfully processed",
    Status.STORAGE_UNIT_UNAVAILABLE: "the required storage unit is unavailable",
    Status.NO_ENTITY_FOUND: "no entity was found",
    Status.DISK_VOLUME_DOWN: "disk volume is down",
    Status.DISK_STORAGE_SERVER_DOWN: "disk storage server is down",
    Status.ENFORCED_MEDIA_UNSUPPORTED: "DTE is enforced, but the media server is earlier than 9.1",
    Status.ENFORCED_CLIENT_UNSUPPORTED: "DTE is enforced, but the client is earlier than 9.1",
    Status.ENFORCED_CLIENT_OFF: "DTE is enforced, but the client DTE mode is Off",
    Status.IMAGE_ON_CLIENT_UNSUPPORTED: "the image DTE mode is On, but the client is earlier than 9.1",
    Status.IMAGE_ON_MEDIA_UNSUPPORTED: "the image DTE mode is On, but a media server is earlier than 9.1",
    Status.CLIENT_ON_MEDIA_OFF: "the client DTE mode is On, but the media server DTE mode is Off",
    Status.ENFORCED_MEDIA_OFF: "DTE is enforced, but the media server DTE mode is Off",
    Status.IMAGE_ON_MEDIA_OFF: "the image DTE mode is On, but the media server DTE mode is Off",
    Status.DTE_NEGOTIATION_REFUSED: "the data channel's DTE negotiation was refused",
    Status.TLS_HANDSHAKE_FAILED: "the data channel's TLS handshake failed",
    Status.RESTORE_CLIENT_ON_MEDIA_OFF: "DTE_CLIENT_MODE is On, but the media server DTE mode is Off (restore)",
}


def for_dte_failure(cause_name: str) -> Status:
    """The status of a DTE failure cause, looked up by name (fabric.dte.FailCause.name)."""
    return Status[cause_name]
