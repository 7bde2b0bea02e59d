# Cascade Mask R-CNN Swin-B (reference: ..._swin_base_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco)
_base_ = './cascade_mask_rcnn_swin_t.py'
model = dict(backbone=dict(embed_dims=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], drop_path_rate=0.3),
             neck=dict(in_channels=[128, 256, 512, 1024]))
