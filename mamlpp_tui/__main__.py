from mamlpp_tui.cli import main

main()
