"""Make Debian's WordNet 3.0 readable by NLTK offline: copy /usr/share/wordnet into an nltk_data layout and write
the `lexnames` file (which Debian does not ship) from the table in `man 5 lexnames`. Idempotent.

Usage: python scripts/install_wordnet.py [NLTK_DATA_DIR]   (default /usr/share/nltk_data, on NLTK's default path)
"""
import gzip
import re
import shutil
import sys
from pathlib import Path

SRC = Path("/usr/share/wordnet")
MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
POS = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}


def lexnames() -> str:
    rows = []
    for line in gzip.open(MAN, "rt", encoding="latin-1"):
        m = re.match(r"^(\d\d)\t(\w+\.\w+)\s*\t", line)
        if m:
            rows.append(f"{m.group(1)}\t{m.group(2)}\t{POS[m.group(2).split('.')[0]]}")
    if len(rows) != 45:
        raise SystemExit(f"expected 45 lexicographer files in {MAN}, found {len(rows)}")
    return "\n".join(rows) + "\n"


def main() -> None:
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/nltk_data") / "corpora" / "wordnet"
    if not (SRC / "index.sense").exists() or not MAN.exists():
        raise SystemExit("Debian WordNet missing: apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index")
    dest.mkdir(parents=True, exist_ok=True)
    for f in SRC.iterdir():
        if f.is_file():
            shutil.copyfile(f, dest / f.name)
    (dest / "lexnames").write_text(lexnames())
    print(f"WordNet for NLTK ready in {dest}")


if __name__ == "__main__":
    main()
