"""A catalog server process whose converter only records which process ran which job.

    python -m tests.api.job_server DATABASE_URL RECORD_FILE ALLOWED_ROOT [JOB_LEASE_S]

Several of these on one PostgreSQL database are what a scaled-out catalog looks like; the record
file (appended to with O_APPEND, one line per job) shows whether any job ran twice.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import uvicorn

from ckptd.api.app import create_app
from ckptd.api.services.jobs import ConversionTask
from ckptd.api.settings import CatalogSettings
from tests.api.conftest import TOKEN


def main() -> None:
    url, record, root = sys.argv[1:4]
    lease = float(sys.argv[4]) if len(sys.argv) > 4 else 30.0

    def convert(task: ConversionTask) -> dict[str, Any]:
        # tp=8 is the slow job some tests kill a server under; the rest widen the race window a little
        time.sleep(600.0 if task.target_mesh["tp"] == 8 else 0.15)
        fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{task.job_id} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
        return {"pid": os.getpid()}

    settings = CatalogSettings(
        database_url=url, api_token=TOKEN, allow_roots=(root,), job_poll_s=0.2, job_lease_s=lease
    )
    app = create_app(settings, converter=convert)
    uvicorn.run(app, host="127.0.0.1", port=0, log_level="info")


if __name__ == "__main__":
    main()
