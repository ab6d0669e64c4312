"""rwkvd's kernels: each fast kernel sits beside the plain-torch reference it is tested against."""
