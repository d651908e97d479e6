package main

import "github.com/flowbus/flowbus/cmd/internal/proctest"

// workerCmd is the hidden first argument that makes flowbench run as a
// traffic worker. The parent starts the worker directly inside a child cgroup,
// so every socket it opens is charged to that cgroup from the first packet.
const workerCmd = "__worker"

// runWorker is the whole life of a worker process: the load of
// proctest.LoadMain (storm or bulk).
func runWorker(args []string) error { return proctest.LoadMain(args) }
