from cropmap.pipeline.cli import main

main()
