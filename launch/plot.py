"""Draw training curves from run folders (several runs: overlaid in one figure).

    python launch/plot.py runs/x                        # runs/x/curves.png (train writes it too)
    python launch/plot.py runs/compare                  # every run below it, e.g. <policy>/seed-<s>/
    python launch/plot.py runs/a runs/b -o ab.png
"""

from toolkit.commands import plot

if __name__ == "__main__":
    plot()
