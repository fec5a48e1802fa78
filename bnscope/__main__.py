from bnscope.cli.app import main

main()
