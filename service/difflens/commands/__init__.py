"""The `difflens` command line's parts (the parsers' flag groups, then one module per subcommand as they move out
of cli.py). Nothing below the command line imports this package.
"""
