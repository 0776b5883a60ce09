from server.bench.client import main

main()
