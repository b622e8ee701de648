// Package pb holds the protobuf messages of kpnode's gossip and fetch
// protocols, generated from kpnode.proto. The generated code is committed;
// regenerate with `go generate ./protocol/pb` (needs protoc and protoc-gen-go
// v1.36, e.g. `apt-get install protobuf-compiler` and
// `go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12`).
package pb

//go:generate protoc --go_out=. --go_opt=paths=source_relative kpnode.proto
