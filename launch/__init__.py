"""The command line: `placerl <command>` dispatches to one module per subcommand here, each a thin parser over rl/, placement/ and rewards/."""
