//go:build tools

// Package tools pins the Kubernetes commands that build.sh compiles, so that
// `go mod tidy` keeps their dependencies in go.mod/go.sum.
// This file is never compiled.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
