"""``python -m benchmarks <engine|serve|peers|coldstart|overload|baseline-server|compare> ...``"""

import sys

from . import baseline_server, coldstart, compare, engine, overload, peers, serve

COMMANDS = {"engine": engine.main, "serve": serve.main, "baseline-server": baseline_server.main,
            "compare": compare.main, "peers": peers.main, "coldstart": coldstart.main, "overload": overload.main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m benchmarks {{{'|'.join(COMMANDS)}}} [options]  (--help for each)", file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
