"""`python -m convo`: the same as the `convo` console script."""

from convo.entry import main

if __name__ == "__main__":
    raise SystemExit(main())
