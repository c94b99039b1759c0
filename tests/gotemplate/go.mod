module forge/gotemplate

go 1.19
