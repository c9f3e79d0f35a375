"""`ilora run`: the whole pipeline as resumable stages, and its report."""
