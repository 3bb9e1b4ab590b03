"""`python -m src.dl.train key=value ...` (and `torchrun ... -m src.dl.train`): the training stage."""

from src.dl.train.run import main

if __name__ == "__main__":
    main()
