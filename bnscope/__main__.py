from bnscope.cli.main import main

main()
