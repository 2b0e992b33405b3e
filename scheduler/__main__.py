"""`python -m scheduler` runs the same CLI as the `wattlane` command."""

from scheduler.cli import main

main()
