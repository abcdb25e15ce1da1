"""Print the requirements of the named extras of pyproject.toml, one per line.

Used by docker/Dockerfile to install an image's dependencies in a layer that only changes
when pyproject.toml does; the posttrain package itself is installed after it, without
dependencies, so editing the code rebuilds one small layer.
Usage: python3 requirements.py PYPROJECT EXTRA[,EXTRA...]
"""

import sys
import tomllib


def main(pyproject: str, extras: str) -> None:
    with open(pyproject, "rb") as fh:
        project = tomllib.load(fh)["project"]
    wanted = list(project["dependencies"])
    for extra in extras.split(","):
        wanted += project["optional-dependencies"][extra]
    print("\n".join(dict.fromkeys(wanted)))


if __name__ == "__main__":
    main(*sys.argv[1:])
