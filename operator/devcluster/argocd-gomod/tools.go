//go:build tools

// Package tools names the Argo CD command this wrapper module builds (../argocd.py).
package tools

import _ "github.com/argoproj/argo-cd/v3/cmd"
