"""`python -m cxrjax.data prepare|stats|sheet ...`: see cxrjax/data/cli.py."""
from cxrjax.data.cli import main

if __name__ == "__main__":
  main()
