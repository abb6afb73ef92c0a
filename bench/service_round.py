"""Rounds of a running pop3-connector service, timed inside the process (the idle scenario).

``pop3-connector run`` polls every account again and again in one long-lived process: what an
idle mailbox costs it, every poll interval, is a round of a service that has already started,
not the interpreter start-up and imports that each ``once`` run pays (about 0.25 s here).  This
runs what ``once`` runs (load the config, set up logging, build the runtime, open the service),
then ``Service.run_once()`` ``rounds`` times, and writes each round's wall and CPU time (all
threads of the process: the ledger's included) as JSON.  The bench reports the last round.

    python -m bench.service_round CONFIG OUT [ROUNDS]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


async def _rounds(config: Path, rounds: int) -> list[dict[str, float | bool]]:
    from connector.cli import setup_logging
    from connector.config import load_settings
    from connector.runtime import build_runtime
    from connector.service import open_service

    settings = load_settings(config)
    setup_logging(settings.service.log_level, settings.service.log_format)
    runtime = build_runtime(settings)
    timings: list[dict[str, float | bool]] = []
    async with open_service(runtime) as service:
        for _ in range(rounds):
            wall, cpu = time.perf_counter(), time.process_time()
            results = await service.run_once()
            timings.append(
                {
                    "wall": time.perf_counter() - wall,
                    "cpu": time.process_time() - cpu,
                    "ok": all(r.ok for r in results),
                }
            )
    return timings


def main(argv: list[str]) -> int:
    from connector import runloop

    config, out = Path(argv[0]), Path(argv[1])
    rounds = int(argv[2]) if len(argv) > 2 else 2
    timings = runloop.run(_rounds(config, rounds))
    out.write_text(json.dumps(timings))
    return 0 if all(t["ok"] for t in timings) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
