//go:build tools

// Package tools pins the etcd server command that ../build.sh compiles, so
// that `go mod tidy` keeps its dependencies in go.mod/go.sum.
// This file is never compiled.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
)
