"""RecBole-style command line: ``python run_recbole.py --model=LayerSelLLM --dataset=ml-100k``.

Takes RecBole's own flags (--model, --dataset, --config_files, --nproc, --ip, --port, --world_size,
--group_offset) and any --key=value, which RecBole's Config reads from the command line itself.
Plugin models resolve first, then RecBole's own (SASRec, BPR, GRU4Rec, ...).
"""

import argparse
import sys

from recbole_layersel.errors import LayerSelError
from recbole_layersel.quick_start import run


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", "-m", type=str, default="LayerSelLLM", help="model name")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="dataset name")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated yaml files")
    parser.add_argument("--nproc", type=int, default=1, help="processes for RecBole's DDP")
    parser.add_argument("--ip", type=str, default="localhost", help="master address for DDP")
    parser.add_argument("--port", type=str, default="5678", help="master port for DDP")
    parser.add_argument("--world_size", type=int, default=-1, help="total processes for DDP")
    parser.add_argument("--group_offset", type=int, default=0, help="rank offset of this node")
    args, _ = parser.parse_known_args()
    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    try:
        run(args.model, args.dataset, config_file_list=config_file_list, nproc=args.nproc,
            world_size=args.world_size, ip=args.ip, port=args.port, group_offset=args.group_offset)
    except LayerSelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
