"""``python -m crl_fast``: the ``crl-fast`` command line (it also puts the current directory on
the import path, so ``gymnasium:<module>:<id>`` envs of a local module are found)."""

from crl_fast.cli import main

main()
