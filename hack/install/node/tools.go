//go:build tools

// Package tools pins the node commands build.sh compiles (kubelet, kube-scheduler) so that
// `go mod tidy` keeps their dependencies in go.mod/go.sum. This file is never compiled.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
