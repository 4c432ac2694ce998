//go:build tools

// Package tools pins the etcd command chronflow's tests build; it is never compiled.
package tools

import _ "go.etcd.io/etcd/server/v3"
